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

/// Most tunnel endpoints the XDP program's table holds (and most tunnels
/// one gateway serves: see the gateway's `MAX_TUNNELS`). 16384 entries of
/// 40 bytes; measured with 10,000 tunnels (docs/performance.md).
pub const MAX_ENDPOINTS: u32 = 16384;
/// Most AF_XDP sockets (one per NIC RX queue) the XSKMAP holds.
pub const MAX_QUEUES: u32 = 64;

/// Key of the XDP program's endpoint table: the outer addresses of a packet
/// as it arrives (its destination is our `local`, its source the `remote`)
/// and its IP protocol. IPv4 addresses sit in the first four bytes of the
/// 16-byte fields, the rest zero.
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
}

// SAFETY: `EndpointKey` is `repr(C)`, has no padding the compiler adds (the
// explicit `pad` fills it to a multiple of its alignment, 1) and every bit
// pattern is valid, which is what `Pod` requires.
#[cfg(feature = "user")]
#[allow(unsafe_code)]
unsafe impl aya::Pod for EndpointKey {}

/// Per-CPU counters kept by the XDP program: every packet it sees is counted
/// as `Seen` and exactly once more under one of the other names.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XdpCounter {
    /// Every packet the program ran on.
    Seen = 0,
    /// Redirected into the AF_XDP socket of its RX queue.
    Redirected,
    /// Passed: not IPv4 or IPv6 (ARP, LLDP, a second VLAN tag, ...).
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
}

/// Number of [`XdpCounter`] values; the size of the counter array map.
pub const XDP_COUNTER_COUNT: u32 = 10;

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
        }
    }
}

/// Names of the maps in the XDP object, shared so neither side spells them.
pub mod maps {
    pub const ENDPOINTS: &str = "ENDPOINTS";
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
    /// Redirects every packet to the AF_XDP socket of its queue.
    pub const REDIRECT_ALL: &str = "bench_redirect_all";
}
