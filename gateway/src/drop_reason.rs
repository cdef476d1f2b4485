//! Why a packet the gateway received was not delivered. A small `Copy` enum
//! counted on the hot path (an array index), never formatted per packet.

/// Every reason a received packet can be dropped. The discriminant is the
/// index into a worker's drop counter array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than its Ethernet or outer IP header.
    Truncated,
    /// Neither IPv4 nor IPv6 (or a second VLAN tag).
    NotIp,
    /// Outer IP header with a bad version, header length or total length.
    OuterMalformed,
    /// Outer IPv4 header checksum wrong.
    OuterChecksum,
    /// Outer IP fragment (reassembly not done).
    OuterFragment,
    /// IPv6 extension headers before the tunnel header.
    OuterIpv6ExtHeader,
    /// Outer protocol is not one of a configured tunnel.
    NotTunnelProtocol,
    /// No tunnel with this outer (local, remote, protocol).
    UnknownEndpoint,
    /// A tunnel with these endpoints exists, but none with this key (or a
    /// keyless tunnel got a keyed packet, or the other way round).
    KeyMismatch,
    /// GRE header shorter than its flags say.
    GreTruncated,
    /// GRE version not 0.
    GreVersion,
    /// GRE routing, strict-source-route, recursion or reserved bits set.
    GreReservedFlags,
    /// GRE checksum present and wrong.
    GreChecksumBad,
    /// The tunnel expects checksums (`icsum`) and the packet has none.
    GreChecksumMissing,
    /// The packet carries a checksum the tunnel does not expect.
    GreChecksumUnexpected,
    /// GRE protocol type the tunnel does not carry.
    GreProtocolUnsupported,
    /// Inner packet of the wrong IP version or with inconsistent lengths.
    InnerMalformed,
    /// Inner packet larger than the device takes.
    InnerTooBig,
    /// The write into the tap/tun device failed.
    DeviceWriteError,
    /// The device took fewer bytes than offered.
    DeviceWriteShort,
}

impl DropReason {
    pub const COUNT: usize = 20;

    pub const ALL: [DropReason; Self::COUNT] = [
        DropReason::Truncated,
        DropReason::NotIp,
        DropReason::OuterMalformed,
        DropReason::OuterChecksum,
        DropReason::OuterFragment,
        DropReason::OuterIpv6ExtHeader,
        DropReason::NotTunnelProtocol,
        DropReason::UnknownEndpoint,
        DropReason::KeyMismatch,
        DropReason::GreTruncated,
        DropReason::GreVersion,
        DropReason::GreReservedFlags,
        DropReason::GreChecksumBad,
        DropReason::GreChecksumMissing,
        DropReason::GreChecksumUnexpected,
        DropReason::GreProtocolUnsupported,
        DropReason::InnerMalformed,
        DropReason::InnerTooBig,
        DropReason::DeviceWriteError,
        DropReason::DeviceWriteShort,
    ];

    /// Stable snake_case name for stats output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Truncated => "truncated",
            DropReason::NotIp => "not_ip",
            DropReason::OuterMalformed => "outer_malformed",
            DropReason::OuterChecksum => "outer_checksum",
            DropReason::OuterFragment => "outer_fragment",
            DropReason::OuterIpv6ExtHeader => "outer_ipv6_ext_header",
            DropReason::NotTunnelProtocol => "not_tunnel_protocol",
            DropReason::UnknownEndpoint => "unknown_endpoint",
            DropReason::KeyMismatch => "key_mismatch",
            DropReason::GreTruncated => "gre_truncated",
            DropReason::GreVersion => "gre_version",
            DropReason::GreReservedFlags => "gre_reserved_flags",
            DropReason::GreChecksumBad => "gre_checksum_bad",
            DropReason::GreChecksumMissing => "gre_checksum_missing",
            DropReason::GreChecksumUnexpected => "gre_checksum_unexpected",
            DropReason::GreProtocolUnsupported => "gre_protocol_unsupported",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::InnerTooBig => "inner_too_big",
            DropReason::DeviceWriteError => "device_write_error",
            DropReason::DeviceWriteShort => "device_write_short",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_complete_and_indexed_by_discriminant() {
        for (i, r) in DropReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
        let mut names: Vec<_> = DropReason::ALL.iter().map(|r| r.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), DropReason::COUNT);
    }
}
