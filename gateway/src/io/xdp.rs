//! Loading the XDP steering program, filling its maps, attaching it, and
//! reading its counters. The program detaches when [`Steering`] is dropped
//! or the process dies (aya attaches through a bpf_link).
#![deny(unsafe_code)]

use std::os::fd::RawFd;

use aya::maps::{Array, HashMap, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpMode};
use aya::Ebpf;
use gateway_common::{
    maps, EndpointKey, EndpointKeyV4, EndpointMapKey, EndpointSlotV4, Settings, XdpCounter,
    XdpCounters, PROGRAM_NAME, SLOT_EMPTY, SLOT_KIND_MASK, SLOT_MANY, SLOT_ONE, XDP_COUNTER_COUNT,
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
    /// What userspace last wrote to each slot of `ENDPOINT_SLOTS_V4` it
    /// has written (an emptied slot stays, with its generation), and the
    /// configured keys that hash there.
    slots_v4: std::collections::HashMap<u32, SlotV4>,
    /// The interface's MAC as last set (zeros before), kept in every slot.
    mac: [u8; 6],
    /// The MAC every slot and SETTINGS hold: `None` from the start of a
    /// [`Steering::set_mac`] until it has written them all.
    mac_applied: Option<[u8; 6]>,
}

/// One slot of the direct-mapped IPv4 table as userspace keeps it.
#[derive(Debug)]
struct SlotV4 {
    /// The slot's value in the map.
    written: EndpointSlotV4,
    /// The configured keys whose slot this is.
    keys: Vec<EndpointKeyV4>,
}

impl Default for SlotV4 {
    fn default() -> Self {
        SlotV4 {
            written: EMPTY_SLOT,
            keys: Vec::new(),
        }
    }
}

/// A slot as the kernel creates it: all zeros.
const EMPTY_SLOT: EndpointSlotV4 = EndpointSlotV4 {
    local: [0; 4],
    remote: [0; 4],
    proto: 0,
    state: SLOT_EMPTY,
    mac: [0; 6],
};

/// Whether a slot may answer alone (`SLOT_ONE`). The program's reads of a
/// slot (state, key and MAC, state again) have no barrier between them, and
/// neither have userspace's successive writes: their order holds on x86-64,
/// whose loads are not reordered with other loads nor stores with other
/// stores, and not on weaker CPUs (arm64), where a reader could pair a new
/// state with an old key and refuse a key that stays configured. There,
/// every slot in use says `SLOT_MANY` and the hash map answers: correct, at
/// the hash lookup's cost.
const SLOTS_ANSWER_ALONE: bool = cfg!(target_arch = "x86_64");

/// The value a slot holding `keys` should have, given its value now
/// (`cur`): the one key and `SLOT_ONE` (where [`SLOTS_ANSWER_ALONE`]), or
/// `SLOT_EMPTY` / `SLOT_MANY` with the key left as it is; `mac` in every
/// case; the generation as `cur`'s ([`slot_writes`] bumps it).
fn slot_value(cur: EndpointSlotV4, keys: &[EndpointKeyV4], mac: [u8; 6]) -> EndpointSlotV4 {
    let generation = cur.state & !SLOT_KIND_MASK;
    match keys {
        [] => EndpointSlotV4 {
            state: generation | SLOT_EMPTY,
            mac,
            ..cur
        },
        [one] if SLOTS_ANSWER_ALONE => EndpointSlotV4 {
            local: one.local,
            remote: one.remote,
            proto: one.proto,
            state: generation | SLOT_ONE,
            mac,
        },
        _ => EndpointSlotV4 {
            state: generation | SLOT_MANY,
            mac,
            ..cur
        },
    }
}

/// Whether two slots hold the same key (local, remote, protocol).
fn same_key(a: &EndpointSlotV4, b: &EndpointSlotV4) -> bool {
    (a.local, a.remote, a.proto) == (b.local, b.remote, b.proto)
}

/// Whether two slots are alike but for their generation.
fn alike(a: &EndpointSlotV4, b: &EndpointSlotV4) -> bool {
    same_key(a, b) && a.kind() == b.kind() && a.mac == b.mac
}

/// The writes that take a slot from `cur` to `want` (kind, key and MAC)
/// by the protocol of [`EndpointSlotV4`]: the key and the MAC change only
/// while the kind is not `SLOT_ONE` before and after the write, the kind
/// only with key and MAC unchanged, and every write bumps the generation,
/// so the program, which trusts a slot's key and MAC only when it read the
/// same state before and after them, never trusts half-written ones (the
/// kernel copies a value with a plain memcpy, in no promised order).
/// `SLOT_MANY` (ask the hash map, which holds every key being added or
/// removed while its slot changes) is the safe kind in between.
fn slot_writes(cur: EndpointSlotV4, want: EndpointSlotV4) -> Vec<EndpointSlotV4> {
    let mut writes = Vec::with_capacity(3);
    let mut now = cur;
    let mut write = |w: EndpointSlotV4, now: &mut EndpointSlotV4| {
        if !alike(&w, now) {
            let generation = (now.state & !SLOT_KIND_MASK).wrapping_add(SLOT_KIND_MASK + 1);
            let w = EndpointSlotV4 {
                state: generation | w.kind(),
                ..w
            };
            writes.push(w);
            *now = w;
        }
    };
    if !same_key(&cur, &want) || cur.mac != want.mac {
        if now.kind() == SLOT_ONE {
            // The kind alone first.
            write(
                EndpointSlotV4 {
                    state: SLOT_MANY,
                    ..now
                },
                &mut now,
            );
        }
        // Then key and MAC, the kind as it is (not `SLOT_ONE`).
        write(
            EndpointSlotV4 {
                local: want.local,
                remote: want.remote,
                proto: want.proto,
                mac: want.mac,
                ..now
            },
            &mut now,
        );
    }
    write(want, &mut now);
    writes
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
        Ok(Steering {
            ebpf,
            program,
            slots_v4: std::collections::HashMap::new(),
            mac: [0; 6],
            mac_applied: None,
        })
    }

    /// Lets packets with this outer (local, remote, protocol) through to the
    /// AF_XDP sockets: into the program's table of the key's family (for
    /// IPv4, the hash map first, then the key's slot in front of it).
    pub fn add_endpoint(&mut self, key: &EndpointKey) -> Result<(), XdpError> {
        let r = match key.map_key() {
            EndpointMapKey::V4(k) => self.endpoints(maps::ENDPOINTS_V4)?.insert(k, 1, 0),
            EndpointMapKey::V6(k) => self.endpoints(maps::ENDPOINTS_V6)?.insert(k, 1, 0),
        };
        r.map_err(|e| XdpError::Map(map_of(key), chain(&e)))?;
        if let EndpointMapKey::V4(k) = key.map_key() {
            if let Err(e) = self.update_slot_v4(k, true) {
                // Not half added: out of the hash map again (a shared
                // slot would otherwise let it in).
                let undo = self
                    .endpoints::<EndpointKeyV4>(maps::ENDPOINTS_V4)
                    .and_then(|mut m| {
                        m.remove(&k)
                            .map_err(|e| XdpError::Map(maps::ENDPOINTS_V4, chain(&e)))
                    });
                if let Err(undo) = undo {
                    tracing::error!(
                        "{undo}: an endpoint half added stays in the XDP program's hash map"
                    );
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stops steering packets with this outer (local, remote, protocol):
    /// for IPv4, its slot first, then the hash map.
    pub fn remove_endpoint(&mut self, key: &EndpointKey) -> Result<(), XdpError> {
        let r = match key.map_key() {
            EndpointMapKey::V4(k) => {
                self.update_slot_v4(k, false)?;
                let r = self.endpoints(maps::ENDPOINTS_V4)?.remove(&k);
                if !matches!(r, Ok(()) | Err(aya::maps::MapError::KeyNotFound)) {
                    // Still in the hash map, so still configured: back in
                    // its slot too.
                    if let Err(e) = self.update_slot_v4(k, true) {
                        tracing::error!("{e}: an endpoint still configured is refused by the XDP program until the gateway restarts");
                    }
                }
                r
            }
            EndpointMapKey::V6(k) => self.endpoints(maps::ENDPOINTS_V6)?.remove(&k),
        };
        match r {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(XdpError::Map(map_of(key), chain(&e))),
        }
    }

    /// Adds `key` to (or removes it from) the keys of its slot in
    /// `ENDPOINT_SLOTS_V4` and writes the slot's new value, in the order
    /// [`slot_writes`] gives. The hash map holds `key` throughout.
    fn update_slot_v4(&mut self, key: EndpointKeyV4, present: bool) -> Result<(), XdpError> {
        let at = key.slot();
        let mut keys = self
            .slots_v4
            .get(&at)
            .map(|s| s.keys.clone())
            .unwrap_or_default();
        if keys.contains(&key) == present {
            return Ok(());
        }
        if present {
            keys.push(key);
        } else {
            keys.retain(|k| *k != key);
        }
        self.write_slot_v4(at, keys)
    }

    /// Brings slot `at` to the value `keys` (its keys from now on) and the
    /// interface's MAC give it.
    fn write_slot_v4(&mut self, at: u32, keys: Vec<EndpointKeyV4>) -> Result<(), XdpError> {
        let cur = self.slots_v4.get(&at).map_or(EMPTY_SLOT, |s| s.written);
        let want = slot_value(cur, &keys, self.mac);
        let name = maps::ENDPOINT_SLOTS_V4;
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(XdpError::Map(name, "missing".into()))?;
        let mut arr: Array<_, EndpointSlotV4> =
            Array::try_from(map).map_err(|e| XdpError::Map(name, chain(&e)))?;
        for w in slot_writes(cur, want) {
            let r = arr.set(at, w, 0);
            if r.is_ok() {
                self.slots_v4.entry(at).or_default().written = w;
            }
            r.map_err(|e| XdpError::Map(name, chain(&e)))?;
        }
        let slot = self.slots_v4.entry(at).or_default();
        slot.keys = keys;
        Ok(())
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

    /// Runs the loaded program once on `frame` with BPF_PROG_TEST_RUN (as
    /// if received on RX queue 0) and returns its action.
    #[cfg(test)]
    #[allow(unsafe_code)]
    fn test_run(&self, frame: &[u8]) -> u32 {
        use std::os::fd::{AsFd, AsRawFd};
        let prog: &Xdp = self
            .ebpf
            .program(self.program)
            .expect("loaded")
            .try_into()
            .expect("an XDP program");
        let fd = prog.fd().expect("loaded").as_fd().as_raw_fd();
        // The leading fields of `union bpf_attr` for BPF_PROG_TEST_RUN
        // (include/uapi/linux/bpf.h); the kernel zero-extends a shorter
        // attribute.
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
        }
        let mut attr = TestRun {
            prog_fd: fd as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: 1,
            ..TestRun::default()
        };
        const BPF_PROG_TEST_RUN: libc::c_long = 10;
        // SAFETY: `attr` is a valid, initialised prefix of `bpf_attr` that
        // outlives the call, and writable: the kernel writes `retval`,
        // `data_size_out` and `duration` back into it; `data_in` points at
        // `frame`, `data_size_in` bytes long, which the kernel only reads
        // (no `data_out`, no context).
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_TEST_RUN,
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>() as u32,
            )
        };
        assert_eq!(
            rc,
            0,
            "BPF_PROG_TEST_RUN: {}",
            std::io::Error::last_os_error()
        );
        attr.retval
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
        // The slots in use first (slots written later take the MAC from
        // `self.mac`), then SETTINGS: once SETTINGS says the new MAC, so
        // does every slot. Meanwhile a frame to the old MAC may still be
        // taken, and one to the new MAC at a slot already rewritten; the
        // gateway's own outer headers use the new one from the start.
        self.mac = mac;
        self.mac_applied = None;
        let used: Vec<(u32, Vec<EndpointKeyV4>)> = self
            .slots_v4
            .iter()
            .map(|(at, s)| (*at, s.keys.clone()))
            .collect();
        for (at, keys) in used {
            self.write_slot_v4(at, keys)?;
        }
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
            .map_err(|e| XdpError::Map(maps::SETTINGS, chain(&e)))?;
        self.mac_applied = Some(mac);
        Ok(())
    }

    /// The MAC the program has everywhere (its slots and SETTINGS), or
    /// `None` when a [`Steering::set_mac`] has not finished: the caller
    /// sets it again until this says the underlay's MAC.
    pub fn mac_applied(&self) -> Option<[u8; 6]> {
        self.mac_applied
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
    use etherparse::{IpNumber, PacketBuilder};
    use gateway_common::SLOTS_V4;

    const MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 8];
    const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 9];

    /// An IPv4 frame to `dst_mac` from `remote` to `local` with protocol
    /// `proto`, built by etherparse, carrying a GRE base header (for 47)
    /// or a few bytes.
    fn frame(dst_mac: [u8; 6], remote: [u8; 4], local: [u8; 4], proto: u8) -> Vec<u8> {
        let payload: &[u8] = if proto == 47 {
            &[0, 0, 0x08, 0x00, 0x45, 0, 0, 20]
        } else {
            &[0x45, 0, 0, 20, 0, 0, 0, 0]
        };
        let mut out = Vec::new();
        PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 58], dst_mac)
            .ipv4(remote, local, 64)
            .write(&mut out, IpNumber(proto), payload)
            .expect("frame");
        out
    }

    /// The counter the real program counted `frame` under (one packet).
    fn verdict(s: &Steering, frame: &[u8]) -> XdpCounter {
        let before = s.counters();
        assert_eq!(s.test_run(frame), 2, "XDP_PASS (no socket in the test)");
        let after = s.counters();
        let moved: Vec<XdpCounter> = XdpCounter::ALL[1..]
            .iter()
            .copied()
            .filter(|c| after[*c as usize] != before[*c as usize])
            .collect();
        assert_eq!(moved.len(), 1, "one counter per packet: {moved:?}");
        moved[0]
    }

    /// Whether the program took it (a match is redirected, or, with no
    /// socket bound as here, counted as `pass_no_socket`).
    fn taken(s: &Steering, f: &[u8]) -> bool {
        match verdict(s, f) {
            XdpCounter::PassNoSocket => true,
            XdpCounter::PassNoEndpoint | XdpCounter::PassOtherHost => false,
            other => panic!("unexpected verdict {other:?}"),
        }
    }

    /// Remotes (198.51.100.1, then 203.0.x.x) whose GRE keys to `local` share one slot of the
    /// direct-mapped table: the inputs are chosen with the slot function,
    /// the verdicts come from the kernel running the program.
    fn colliding(local: [u8; 4], n: usize) -> Vec<[u8; 4]> {
        let first = EndpointKeyV4::new(local, [198, 51, 100, 1], 47).slot();
        let mut out = vec![[198, 51, 100, 1]];
        for i in 0..=u16::MAX {
            let r = [203, 0, (i >> 8) as u8, i as u8];
            if EndpointKeyV4::new(local, r, 47).slot() == first {
                out.push(r);
                if out.len() == n {
                    break;
                }
            }
        }
        assert_eq!(out.len(), n, "{n} keys sharing a slot of {SLOTS_V4}");
        out
    }

    /// The slot `key` is in, as the map holds it.
    fn slot_of(s: &Steering, key: &EndpointKeyV4) -> EndpointSlotV4 {
        let map = s.ebpf.map(maps::ENDPOINT_SLOTS_V4).expect("slots");
        let arr: Array<_, EndpointSlotV4> = Array::try_from(map).expect("an array");
        arr.get(&key.slot(), 0).expect("a slot")
    }

    /// Writes the `SETTINGS` entry alone, as a program that disagreed
    /// with its slots would see it.
    fn settings_mac(s: &mut Steering, mac: [u8; 6]) {
        let map = s.ebpf.map_mut(maps::SETTINGS).expect("settings");
        let mut arr: Array<_, Settings> = Array::try_from(map).expect("an array");
        let v = Settings {
            mac,
            mac_set: 1,
            pad: 0,
        };
        arr.set(0, v, 0).expect("settings written");
    }

    /// A slot that holds its key and the interface's MAC vouches for the
    /// destination without `SETTINGS`; `set_mac` rewrites every slot in
    /// use. Needs root; only where a slot answers alone.
    #[test]
    #[cfg_attr(
        not(target_arch = "x86_64"),
        ignore = "slots answer alone only on x86-64 (SLOTS_ANSWER_ALONE)"
    )]
    fn a_slot_vouches_for_its_mac_and_set_mac_rewrites_the_slots() {
        if !am_root("a_slot_vouches_for_its_mac_and_set_mac_rewrites_the_slots") {
            return;
        }
        let mut s = Steering::load().expect("load the program");
        let local = [192, 0, 2, 8];
        let remote = [198, 51, 100, 1];
        let k4 = EndpointKeyV4::new(local, remote, 47);
        s.add_endpoint(&EndpointKey::v4(local, remote, 47)).unwrap();
        assert_eq!(slot_of(&s, &k4).mac, [0; 6]);
        s.set_mac(OTHER_MAC).unwrap();
        assert_eq!(slot_of(&s, &k4).mac, OTHER_MAC);
        s.set_mac(MAC).unwrap();
        let slot = slot_of(&s, &k4);
        assert_eq!((slot.mac, slot.kind()), (MAC, SLOT_ONE));
        // SETTINGS now says another MAC: a frame to the slot's MAC is
        // still taken (the slot vouched), one to a third MAC is not.
        settings_mac(&mut s, OTHER_MAC);
        assert!(taken(&s, &frame(MAC, remote, local, 47)));
        assert_eq!(
            verdict(&s, &frame([0x02, 0, 0, 0, 0, 0x77], remote, local, 47)),
            XdpCounter::PassOtherHost
        );
        // (A runt, shorter than an Ethernet header, cannot be run here:
        // BPF_PROG_TEST_RUN refuses frames under 14 bytes.)
    }

    /// A configured endpoint's tunnel packet, VLAN-tagged (802.1Q and
    /// 802.1ad, built by etherparse), is its VLAN's: passed as
    /// `pass_vlan`; untagged, taken. Needs root.
    #[test]
    fn a_vlan_tagged_frame_is_passed_to_the_kernel() {
        if !am_root("a_vlan_tagged_frame_is_passed_to_the_kernel") {
            return;
        }
        let mut s = Steering::load().expect("load the program");
        let (local, remote) = ([192, 0, 2, 8], [198, 51, 100, 1]);
        s.add_endpoint(&EndpointKey::v4(local, remote, 47)).unwrap();
        s.set_mac(MAC).unwrap();
        let untagged = frame(MAC, remote, local, 47);
        assert!(taken(&s, &untagged));
        for tpid in [
            etherparse::EtherType::VLAN_TAGGED_FRAME,
            etherparse::EtherType::PROVIDER_BRIDGING,
        ] {
            let f = crate::wire::ethernet::tagged_by_etherparse(&untagged, tpid, 100);
            assert_eq!(verdict(&s, &f), XdpCounter::PassVlan, "{tpid:?}");
        }
        // Two tags (802.1ad, then 802.1Q), and an ICMP "fragmentation
        // needed" about the tunnel's packet (which untagged would go to
        // the gateway), tagged.
        let mut qinq = Vec::new();
        etherparse::PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 58], MAC)
            .double_vlan(
                etherparse::VlanId::try_new(10).unwrap(),
                etherparse::VlanId::try_new(100).unwrap(),
            )
            .ipv4(remote, local, 64)
            .write(&mut qinq, IpNumber(47), &untagged[34..])
            .unwrap();
        assert_eq!(
            u16::from_be_bytes([qinq[12], qinq[13]]),
            0x88a8,
            "an 802.1ad outer tag"
        );
        assert_eq!(verdict(&s, &qinq), XdpCounter::PassVlan);
        let mut quoted = Vec::new();
        etherparse::Ipv4Header::new(28, 64, IpNumber(47), local, remote)
            .unwrap()
            .write(&mut quoted)
            .unwrap();
        quoted.extend_from_slice(&[0; 8]);
        let icmp_type = etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1300 },
        );
        let frag_needed = |vlan: bool| {
            let mut f = Vec::new();
            let b = etherparse::PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], MAC);
            let r = if vlan {
                b.single_vlan(etherparse::VlanId::try_new(100).unwrap())
                    .ipv4([192, 0, 2, 1], local, 64)
                    .icmpv4(icmp_type.clone())
                    .write(&mut f, &quoted)
            } else {
                b.ipv4([192, 0, 2, 1], local, 64)
                    .icmpv4(icmp_type.clone())
                    .write(&mut f, &quoted)
            };
            r.unwrap();
            f
        };
        assert!(taken(&s, &frag_needed(false)), "untagged, the gateway's");
        assert_eq!(verdict(&s, &frag_needed(true)), XdpCounter::PassVlan);
    }

    /// Whether the tests run as root; says so when they do not.
    fn am_root(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        #[allow(unsafe_code)]
        let root = unsafe { libc::geteuid() } == 0;
        if !root {
            eprintln!("SKIPPED {test}: loading the XDP program needs root");
        }
        root
    }

    /// The program and userspace agree on every slot state: one key in its
    /// slot, keys sharing a slot (the hash map answers), a slot emptied, a
    /// shared slot back to one key, and a key that merely shares a slot
    /// with configured ones is passed. Needs root (it loads the program).
    #[test]
    fn the_direct_mapped_table_and_the_hash_map_agree_with_the_program() {
        if !am_root("the_direct_mapped_table_and_the_hash_map_agree_with_the_program") {
            return;
        }
        let mut s = Steering::load().expect("load the program");
        let local = [192, 0, 2, 8];
        let r = colliding(local, 4);
        let key = |remote: [u8; 4]| EndpointKey::v4(local, remote, 47);
        let f = |remote: [u8; 4]| frame(MAC, remote, local, 47);

        // Endpoints added before the MAC is known, and after.
        s.add_endpoint(&key(r[0])).unwrap();
        assert!(taken(&s, &f(r[0])));
        s.set_mac(MAC).unwrap();
        assert!(taken(&s, &f(r[0])), "one key alone in its slot");
        assert!(!taken(&s, &f(r[1])), "same slot, not configured");
        assert_eq!(
            verdict(&s, &frame(OTHER_MAC, r[0], local, 47)),
            XdpCounter::PassOtherHost
        );
        // A multicast destination is not another host's.
        assert!(taken(&s, &frame([0x01, 0, 0x5e, 0, 0, 1], r[0], local, 47)));
        // The same addresses with IPIP: another key.
        assert!(!taken(&s, &frame(MAC, r[0], local, 4)));

        // Three keys in one slot: the hash map answers.
        s.add_endpoint(&key(r[1])).unwrap();
        s.add_endpoint(&key(r[2])).unwrap();
        for (i, remote) in r.iter().enumerate() {
            assert_eq!(taken(&s, &f(*remote)), i < 3, "shared slot, remote {i}");
        }
        assert_eq!(
            verdict(&s, &frame(OTHER_MAC, r[1], local, 47)),
            XdpCounter::PassOtherHost
        );

        // Back to one key (not the first one), then to none.
        s.remove_endpoint(&key(r[0])).unwrap();
        s.remove_endpoint(&key(r[1])).unwrap();
        assert!(!taken(&s, &f(r[0])));
        assert!(!taken(&s, &f(r[1])));
        assert!(taken(&s, &f(r[2])), "the one key left in the slot");
        s.remove_endpoint(&key(r[2])).unwrap();
        for remote in &r {
            assert!(!taken(&s, &f(*remote)));
        }
        // And a new key in the emptied slot.
        s.add_endpoint(&key(r[3])).unwrap();
        assert!(taken(&s, &f(r[3])));
        assert!(!taken(&s, &f(r[2])));
    }

    /// Each write keeps the protocol the program relies on: the key
    /// changes only while the kind is not "one key", before and after the
    /// write, the kind only with the key unchanged, and the generation with
    /// every write; the last write is what was wanted. Over a walk through
    /// every pair of key sets, each starting where the last one ended (so
    /// from emptied and shared slots still holding an earlier key), with
    /// the MAC changing on the way.
    #[test]
    fn slot_writes_keep_the_protocol_over_any_walk() {
        let k = |n: u8| EndpointKeyV4::new([10, 0, 0, n], [10, 0, 1, n], 47);
        let sets: Vec<Vec<EndpointKeyV4>> = vec![
            vec![],
            vec![k(1)],
            vec![k(2)],
            vec![k(1), k(2)],
            vec![k(2), k(3)],
            vec![k(1), k(2), k(3)],
        ];
        let mut now = EMPTY_SLOT;
        let mut writes_seen = 0;
        for (step, (from, to)) in sets
            .iter()
            .flat_map(|a| sets.iter().map(move |b| (a, b)))
            .enumerate()
        {
            let mac = if step % 7 < 3 { [0; 6] } else { MAC };
            for keys in [from, to] {
                let want = slot_value(now, keys, mac);
                for w in slot_writes(now, want) {
                    let key_moved = (now.local, now.remote, now.proto, now.mac)
                        != (w.local, w.remote, w.proto, w.mac);
                    assert!(!(key_moved && now.kind() != w.kind()), "{now:?} -> {w:?}");
                    if key_moved {
                        assert!(
                            now.kind() != SLOT_ONE && w.kind() != SLOT_ONE,
                            "{now:?} -> {w:?}"
                        );
                    }
                    assert_ne!(now.state, w.state, "every write a new generation");
                    now = w;
                    writes_seen += 1;
                }
                assert_eq!(
                    (now.local, now.remote, now.proto, now.kind(), now.mac),
                    (want.local, want.remote, want.proto, want.kind(), mac),
                    "{keys:?}"
                );
                if let [one] = keys.as_slice() {
                    if SLOTS_ANSWER_ALONE {
                        assert!(
                            now.kind() == SLOT_ONE
                                && (now.local, now.remote, now.proto)
                                    == (one.local, one.remote, one.proto)
                        );
                    } else {
                        assert_eq!(now.kind(), SLOT_MANY, "the hash map answers");
                    }
                }
            }
        }
        assert!(
            writes_seen > 36,
            "the walk wrote slots ({writes_seen} writes)"
        );
    }

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
