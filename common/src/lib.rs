//! Types shared by the XDP program (`ebpf/`) and the gateway (`gateway/`).
//!
//! Everything here is `#[repr(C)]` plain data: the same bytes are written by
//! userspace into BPF maps and read by the program in the kernel.
#![no_std]
#![deny(unsafe_code)]

/// IP protocol number of GRE.
pub const IPPROTO_GRE: u8 = 47;
/// IP protocol number of IPv4-in-IP (IPIP).
pub const IPPROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6-in-IP.
pub const IPPROTO_IPV6: u8 = 41;

/// Address family tag in [`EndpointKey::family`].
pub const FAMILY_V4: u8 = 4;
/// Address family tag in [`EndpointKey::family`].
pub const FAMILY_V6: u8 = 6;

/// Most tunnel endpoints each of the XDP program's tables (IPv4 and IPv6)
/// holds (and most tunnels one gateway serves: see the gateway's
/// `MAX_TUNNELS`). 16384 entries of 12 bytes (IPv4) and of 36 (IPv6);
/// measured with 10,000 tunnels (docs/performance.md).
pub const MAX_ENDPOINTS: u32 = 16384;
/// Most AF_XDP sockets (one per NIC RX queue) the XSKMAP holds.
pub const MAX_QUEUES: u32 = 64;

/// The gateway's key of a tunnel's endpoints: the outer addresses of a
/// packet as it arrives (its destination is our `local`, its source the
/// `remote`) and its IP protocol, either family in one type (the tunnel
/// table's key). IPv4 addresses sit in the first four bytes of the 16-byte
/// fields, the rest zero. The XDP program keeps one table per family, each
/// with a key of its own size: [`EndpointKey::map_key`] says which.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub proto: u8,
    pub family: u8,
    pub pad: [u8; 2],
}

impl EndpointKey {
    pub const fn v4(local: [u8; 4], remote: [u8; 4], proto: u8) -> Self {
        let mut l = [0u8; 16];
        let mut r = [0u8; 16];
        l[0] = local[0];
        l[1] = local[1];
        l[2] = local[2];
        l[3] = local[3];
        r[0] = remote[0];
        r[1] = remote[1];
        r[2] = remote[2];
        r[3] = remote[3];
        EndpointKey {
            local: l,
            remote: r,
            proto,
            family: FAMILY_V4,
            pad: [0; 2],
        }
    }

    pub const fn v6(local: [u8; 16], remote: [u8; 16], proto: u8) -> Self {
        EndpointKey {
            local,
            remote,
            proto,
            family: FAMILY_V6,
            pad: [0; 2],
        }
    }

    /// The key of this endpoint in the XDP program's table of its family.
    pub const fn map_key(&self) -> EndpointMapKey {
        if self.family == FAMILY_V4 {
            let (l, r) = (&self.local, &self.remote);
            EndpointMapKey::V4(EndpointKeyV4::new(
                [l[0], l[1], l[2], l[3]],
                [r[0], r[1], r[2], r[3]],
                self.proto,
            ))
        } else {
            EndpointMapKey::V6(EndpointKeyV6::new(self.local, self.remote, self.proto))
        }
    }
}

/// An [`EndpointKey`] as the XDP program's table of its family takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndpointMapKey {
    V4(EndpointKeyV4),
    V6(EndpointKeyV6),
}

/// Key of the XDP program's IPv4 endpoint table (`ENDPOINTS_V4`): 12 bytes,
/// so the hash of the common case covers no more than the packet's own
/// addresses and protocol.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKeyV4 {
    /// The packet's destination: our address.
    pub local: [u8; 4],
    /// The packet's source: the tunnel's remote.
    pub remote: [u8; 4],
    pub proto: u8,
    /// Zero: the kernel hashes and compares every byte of a key.
    pub pad: [u8; 3],
}

impl EndpointKeyV4 {
    #[inline(always)]
    pub const fn new(local: [u8; 4], remote: [u8; 4], proto: u8) -> Self {
        EndpointKeyV4 {
            local,
            remote,
            proto,
            pad: [0; 3],
        }
    }
}

/// Key of the XDP program's IPv6 endpoint table (`ENDPOINTS_V6`): 36 bytes.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndpointKeyV6 {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub proto: u8,
    /// Zero: the kernel hashes and compares every byte of a key.
    pub pad: [u8; 3],
}

impl EndpointKeyV6 {
    #[inline(always)]
    pub const fn new(local: [u8; 16], remote: [u8; 16], proto: u8) -> Self {
        EndpointKeyV6 {
            local,
            remote,
            proto,
            pad: [0; 3],
        }
    }
}

/// Slots of the XDP program's direct-mapped IPv4 endpoint table
/// (`ENDPOINT_SLOTS_V4`), in front of the hash map: a power of two.
pub const SLOTS_V4: u32 = 16384;

/// Slot kind: no configured IPv4 endpoint hashes to this slot.
pub const SLOT_EMPTY: u8 = 0;
/// Slot kind: exactly one does, and the slot holds its key.
pub const SLOT_ONE: u8 = 1;
/// Slot kind: more than one does; the hash map (`ENDPOINTS_V4`) answers.
pub const SLOT_MANY: u8 = 2;
/// The bits of [`EndpointSlotV4::state`] that hold the kind; the six above
/// them count the slot's writes (a generation, modulo 64).
pub const SLOT_KIND_MASK: u8 = 3;

/// One slot of `ENDPOINT_SLOTS_V4`: 16 bytes (one cache line, the kernel
/// placing array values at least 8-aligned: at worst two), with the
/// interface's MAC in it, so the common packet's whole verdict comes from
/// this one slot.
///
/// Userspace rewrites a slot with a plain copy of 16 bytes while the
/// program may be reading it, so the two keep to a protocol (the gateway's
/// `io/xdp.rs`, the program's `find_v4`): userspace changes the key and
/// the MAC only while the kind is not [`SLOT_ONE`], the kind only with key
/// and MAC unchanged, and bumps the generation with every write; the
/// program reads `state`, then the key and MAC, then `state` again, and
/// trusts them only when both reads agree (else it asks the hash map,
/// which holds every key of a slot being rewritten). The order of the
/// program's reads is kept by the compiler (volatile) and, on x86-64, by
/// the CPU, which also keeps userspace's successive writes in order. CPUs
/// that reorder loads or stores (arm64) give no such order, so there
/// userspace never writes [`SLOT_ONE`]: every slot in use says
/// [`SLOT_MANY`] and the hash map answers.
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EndpointSlotV4 {
    pub local: [u8; 4],
    pub remote: [u8; 4],
    pub proto: u8,
    /// Kind (low two bits, [`SLOT_KIND_MASK`]) and generation.
    pub state: u8,
    /// The interface's MAC as [`Settings::mac`] (zeros before it is set):
    /// a unicast frame to it needs no look at `SETTINGS`.
    pub mac: [u8; 6],
}

impl EndpointSlotV4 {
    /// The slot's kind: [`SLOT_EMPTY`], [`SLOT_ONE`] or [`SLOT_MANY`].
    pub const fn kind(&self) -> u8 {
        self.state & SLOT_KIND_MASK
    }
}

const _: () = assert!(core::mem::size_of::<EndpointSlotV4>() == 16);
const _: () = assert!(SLOTS_V4.is_power_of_two());

/// The slot of `ENDPOINT_SLOTS_V4` an IPv4 endpoint key goes in, from its
/// three words as they lie in memory (`local`, `remote`, then `proto` and
/// the zero pad): the XDP program and userspace both call this, so they
/// agree on the slot by construction. A multiplicative hash: cheap in BPF
/// (no loop, no helper); a hostile sender choosing its source address
/// reaches at most a slot's compare or the hash map, as before.
#[inline(always)]
pub const fn slot_v4(local: u32, remote: u32, proto_word: u32) -> u32 {
    let mixed = local ^ remote.rotate_left(16) ^ proto_word.rotate_left(7);
    mixed.wrapping_mul(0x9e37_79b1) >> (32 - SLOTS_V4.trailing_zeros())
}

impl EndpointKeyV4 {
    /// This key's slot of `ENDPOINT_SLOTS_V4` ([`slot_v4`] of its words).
    pub const fn slot(&self) -> u32 {
        slot_v4(
            u32::from_ne_bytes(self.local),
            u32::from_ne_bytes(self.remote),
            u32::from_ne_bytes([self.proto, self.pad[0], self.pad[1], self.pad[2]]),
        )
    }
}

const _: () = assert!(core::mem::size_of::<EndpointKeyV4>() == 12);
const _: () = assert!(core::mem::size_of::<EndpointKeyV6>() == 36);

// SAFETY: both keys are `repr(C)` with only `u8` fields and explicit `pad`
// bytes: no padding the compiler adds (12 and 36 bytes are multiples of
// their alignment, 4, as the assertions above check), and every bit
// pattern is valid, which is what `Pod` requires.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for EndpointKeyV4 {}
// SAFETY: as above.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for EndpointKeyV6 {}
// SAFETY: `repr(C)`, `u8` fields only (16 bytes, no padding: the
// assertion above), every bit pattern valid.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for EndpointSlotV4 {}

/// Counters kept by the XDP program, in one per-CPU slot
/// ([`XdpCounters`]): every packet it sees is counted once, under the
/// reason for its verdict. `Seen` is not counted by the steering program:
/// userspace shows it as the sum of every slot (`Seen`'s own slot counts
/// only packets of the bench's counting program, which have no verdict).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// Every packet the program ran on (the sum of the others).
    Seen = 0,
    /// Redirected into the AF_XDP socket of its RX queue.
    Redirected,
    /// Passed: not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNotIp,
    /// Passed: IP, but not GRE or IPIP.
    PassOtherProto,
    /// Passed: GRE or IPIP, but no configured (local, remote) pair matches.
    PassNoEndpoint,
    /// Passed: headers shorter than they claim to be.
    PassTruncated,
    /// Passed: an outer fragment (reassembly is the kernel's, for now).
    PassFragment,
    /// Passed: IPv6 with extension headers before the tunnel header.
    PassIpv6ExtHeader,
    /// Passed: matched, but no AF_XDP socket is bound on this RX queue.
    PassNoSocket,
    /// Passed: unicast to another host's MAC (a NIC in promiscuous mode, or
    /// a bridge flooding); the kernel drops these too.
    PassOtherHost,
    /// Passed: VLAN-tagged (802.1Q, 802.1ad). The underlay carries tunnels
    /// untagged; a VLAN's frames are its VLAN device's, as in the kernel.
    PassVlan,
}

/// Number of [`XdpCounter`] values.
pub const XDP_COUNTER_COUNT: u32 = 11;

/// The value of the `COUNTERS` per-CPU array's one entry: a count per
/// [`XdpCounter`], indexed by it. One lookup per packet finds them all.
pub type XdpCounters = [u64; XDP_COUNTER_COUNT as usize];

impl XdpCounter {
    pub const ALL: [XdpCounter; XDP_COUNTER_COUNT as usize] = [
        XdpCounter::Seen,
        XdpCounter::Redirected,
        XdpCounter::PassNotIp,
        XdpCounter::PassOtherProto,
        XdpCounter::PassNoEndpoint,
        XdpCounter::PassTruncated,
        XdpCounter::PassFragment,
        XdpCounter::PassIpv6ExtHeader,
        XdpCounter::PassNoSocket,
        XdpCounter::PassOtherHost,
        XdpCounter::PassVlan,
    ];

    /// Stable name used in logs, stats output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            XdpCounter::Seen => "seen",
            XdpCounter::Redirected => "redirected",
            XdpCounter::PassNotIp => "pass_not_ip",
            XdpCounter::PassOtherProto => "pass_other_proto",
            XdpCounter::PassNoEndpoint => "pass_no_endpoint",
            XdpCounter::PassTruncated => "pass_truncated",
            XdpCounter::PassFragment => "pass_fragment",
            XdpCounter::PassIpv6ExtHeader => "pass_ipv6_ext_header",
            XdpCounter::PassNoSocket => "pass_no_socket",
            XdpCounter::PassOtherHost => "pass_other_host",
            XdpCounter::PassVlan => "pass_vlan",
        }
    }
}

/// Names of the maps in the XDP object, shared so neither side spells them.
pub mod maps {
    /// Configured IPv4 endpoints, [`crate::EndpointKeyV4`] keys.
    pub const ENDPOINTS_V4: &str = "ENDPOINTS_V4";
    /// The direct-mapped table in front of `ENDPOINTS_V4`:
    /// [`crate::SLOTS_V4`] slots of [`crate::EndpointSlotV4`].
    pub const ENDPOINT_SLOTS_V4: &str = "ENDPOINT_SLOTS_V4";
    /// Configured IPv6 endpoints, [`crate::EndpointKeyV6`] keys.
    pub const ENDPOINTS_V6: &str = "ENDPOINTS_V6";
    pub const XSKS: &str = "XSKS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SETTINGS: &str = "SETTINGS";
}

/// The program's settings (one entry of the `SETTINGS` array map).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// The interface's MAC: unicast frames to any other are passed.
    pub mac: [u8; 6],
    /// Non-zero once userspace has filled `mac`.
    pub mac_set: u8,
    pub pad: u8,
}

// SAFETY: `repr(C)`, eight one-byte fields, no padding; any bit pattern is
// a valid value.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for Settings {}

/// Name of the XDP program in the object.
pub const PROGRAM_NAME: &str = "gateway_steer";

/// Programs in the same object used only by the bench harness.
pub mod bench_programs {
    /// Counts every packet as `Seen` and drops it: the wire's ceiling.
    pub const DROP: &str = "bench_drop";
    /// Redirects every packet to the AF_XDP socket of its queue and does
    /// nothing else, as libxdp's default program: the generator's, and the
    /// ceiling of the steering program's run time.
    pub const REDIRECT_ALL: &str = "bench_redirect_all";
}
