//! Why a packet the gateway received was not delivered. A small `Copy` enum
//! counted on the hot path (an array index), never formatted per packet.

/// Every reason a received packet can be dropped. The discriminant is the
/// index into a worker's drop counter array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DropReason {
    /// Shorter than its Ethernet or outer IP header.
    Truncated,
    /// Neither IPv4 nor IPv6, or VLAN-tagged (the outer frame comes untagged).
    NotIp,
    /// Outer IP header with a bad version, header length or total length.
    OuterMalformed,
    /// Outer IPv4 header checksum wrong.
    OuterChecksum,
    /// Outer IP fragment: decap hands it to reassembly (the worker counts
    /// it only if reassembly drops it, under a `fragment_` reason).
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
    /// The GRE routing bit, or a reserved flag the kernel refuses, set.
    GreReservedFlags,
    /// GRE checksum present and wrong.
    GreChecksumBad,
    /// The tunnel expects checksums (`icsum`) and the packet has none.
    GreChecksumMissing,
    /// The packet carries a checksum the tunnel does not expect.
    GreChecksumUnexpected,
    /// GRE protocol type the tunnel does not carry.
    GreProtocolUnsupported,
    /// The tunnel expects sequence numbers (`iseq`) and the packet has none.
    GreSequenceMissing,
    /// A sequence number older than (or equal to) the last accepted one.
    GreSequenceOld,
    /// Outer ECN says congestion (CE) but the inner packet is not
    /// ECN-capable: RFC 6040 (and the kernel) drop it.
    EcnCeOnNotEct,
    /// A GRE keepalive whose inner TTL would expire on the way back.
    KeepaliveTtlExpired,
    /// A GRE keepalive to answer, but the tunnel's next hop is not resolved.
    KeepaliveNoNeighbour,
    /// An ICMP error about a tunnel packet that is too short, has a wrong
    /// checksum or an impossible MTU.
    IcmpMalformed,
    /// An outer fragment that cannot be part of a datagram (a length not a
    /// multiple of 8, data past the end, two ends, too many pieces).
    FragmentMalformed,
    /// Fragments overlapping: the whole datagram is dropped.
    FragmentOverlap,
    /// A reassembled datagram longer than the gateway reassembles.
    FragmentTooBig,
    /// Too many datagrams in reassembly (per worker, or per source).
    FragmentTableFull,
    /// A datagram not whole within the reassembly timeout.
    FragmentTimeout,
    /// Inner packet of the wrong IP version or with inconsistent lengths.
    InnerMalformed,
    /// Inner packet larger than the device takes.
    InnerTooBig,
    /// The write into the tap/tun device failed.
    DeviceWriteError,
    /// The device took fewer bytes than offered.
    DeviceWriteShort,
    /// The tunnel's device was deleted from under the gateway (it is
    /// re-created within a second).
    DeviceGone,
    /// The tunnel's device is administratively down (`ip link set DEV
    /// down`); the kernel refuses packets written into it.
    DeviceDown,
    /// Handed to another worker to write, and back unwritten after a
    /// reload that was forced through (a worker did not answer in time):
    /// its tunnel index belongs to the old list.
    ReloadStale,
    /// Inner source is not the tunnel's peer (nor a network behind it).
    InnerSourceNotPeer,
    /// An outer fragment that repeats bytes already held (an exact
    /// duplicate, or one inside a run of held fragments): dropped alone, the
    /// datagram kept, as the kernel's `inet_frag_queue_insert` does.
    FragmentDuplicate,
    /// An ICMP error about a tunnel packet that is not addressed to that
    /// tunnel's local address (anyone could otherwise lower its path MTU).
    IcmpNotLocal,
    /// An ICMP error about a tunnel packet beyond the rate the gateway
    /// takes them at (path MTU updates per second, per worker).
    IcmpRateLimited,

    // ---- the way out: packets read from a tunnel's device ----
    /// Reading from the device failed.
    TxDeviceReadError,
    /// A frame from a tap that is neither IP nor an ARP request we answer.
    TxNotIp,
    /// Inner packet with a bad header or inconsistent lengths.
    TxMalformed,
    /// Kernel chatter that must not enter a tunnel: IPv6 link-local or
    /// multicast (router solicitations, MLD reports), IPv4 multicast and
    /// broadcast, ARP that is not a request.
    TxChatter,
    /// An inner family the tunnel does not carry (IPv6 into IPIP).
    TxFamilyNotCarried,
    /// Larger than the tunnel MTU without DF (not fragmented; counted).
    TxTooBig,
    /// Larger than the tunnel MTU with DF (IPv4) or any IPv6: answered with
    /// ICMP "fragmentation needed" / "packet too big" into the device.
    TxTooBigIcmpSent,
    /// The next hop's MAC is not known (yet): resolution was requested.
    TxNoNeighbour,
    /// No room in the AF_XDP TX ring.
    TxRingFull,
    /// Writing an ARP/ND answer or an ICMP error back into the device failed.
    TxReplyWriteError,
    /// Read from a device but not sent because the gateway was stopping.
    TxShutdown,
    /// Larger than the tunnel MTU, and no ICMP error sent back: the packet
    /// is itself an ICMP error or a non-first fragment (never answered, RFC
    /// 1122 and 4443), or the worker's ICMP rate (1000/s) is spent.
    TxTooBigNoIcmp,
}

impl DropReason {
    pub const COUNT: usize = 50;

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
        DropReason::GreSequenceMissing,
        DropReason::GreSequenceOld,
        DropReason::EcnCeOnNotEct,
        DropReason::KeepaliveTtlExpired,
        DropReason::KeepaliveNoNeighbour,
        DropReason::IcmpMalformed,
        DropReason::FragmentMalformed,
        DropReason::FragmentOverlap,
        DropReason::FragmentTooBig,
        DropReason::FragmentTableFull,
        DropReason::FragmentTimeout,
        DropReason::InnerMalformed,
        DropReason::InnerTooBig,
        DropReason::DeviceWriteError,
        DropReason::DeviceWriteShort,
        DropReason::DeviceGone,
        DropReason::DeviceDown,
        DropReason::ReloadStale,
        DropReason::InnerSourceNotPeer,
        DropReason::FragmentDuplicate,
        DropReason::IcmpNotLocal,
        DropReason::IcmpRateLimited,
        DropReason::TxDeviceReadError,
        DropReason::TxNotIp,
        DropReason::TxMalformed,
        DropReason::TxChatter,
        DropReason::TxFamilyNotCarried,
        DropReason::TxTooBig,
        DropReason::TxTooBigIcmpSent,
        DropReason::TxNoNeighbour,
        DropReason::TxRingFull,
        DropReason::TxReplyWriteError,
        DropReason::TxShutdown,
        DropReason::TxTooBigNoIcmp,
    ];

    /// Stable snake_case name for stats output and metrics.
    /// True for reasons of the way out (packets read from a device).
    pub const fn is_tx(self) -> bool {
        (self as u8) >= (DropReason::TxDeviceReadError as u8)
    }

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
            DropReason::GreSequenceMissing => "gre_sequence_missing",
            DropReason::GreSequenceOld => "gre_sequence_old",
            DropReason::EcnCeOnNotEct => "ecn_ce_on_not_ect",
            DropReason::KeepaliveTtlExpired => "keepalive_ttl_expired",
            DropReason::KeepaliveNoNeighbour => "keepalive_no_neighbour",
            DropReason::IcmpMalformed => "icmp_malformed",
            DropReason::FragmentMalformed => "fragment_malformed",
            DropReason::FragmentOverlap => "fragment_overlap",
            DropReason::FragmentTooBig => "fragment_too_big",
            DropReason::FragmentTableFull => "fragment_table_full",
            DropReason::FragmentTimeout => "fragment_timeout",
            DropReason::InnerMalformed => "inner_malformed",
            DropReason::InnerTooBig => "inner_too_big",
            DropReason::DeviceWriteError => "device_write_error",
            DropReason::DeviceGone => "device_gone",
            DropReason::DeviceDown => "device_down",
            DropReason::ReloadStale => "reload_stale",
            DropReason::DeviceWriteShort => "device_write_short",
            DropReason::InnerSourceNotPeer => "inner_source_not_peer",
            DropReason::FragmentDuplicate => "fragment_duplicate",
            DropReason::IcmpNotLocal => "icmp_not_local",
            DropReason::IcmpRateLimited => "icmp_rate_limited",
            DropReason::TxDeviceReadError => "tx_device_read_error",
            DropReason::TxNotIp => "tx_not_ip",
            DropReason::TxMalformed => "tx_malformed",
            DropReason::TxChatter => "tx_chatter",
            DropReason::TxFamilyNotCarried => "tx_family_not_carried",
            DropReason::TxTooBig => "tx_too_big",
            DropReason::TxTooBigIcmpSent => "tx_too_big_icmp_sent",
            DropReason::TxNoNeighbour => "tx_no_neighbour",
            DropReason::TxRingFull => "tx_ring_full",
            DropReason::TxReplyWriteError => "tx_reply_write_error",
            DropReason::TxShutdown => "tx_shutdown",
            DropReason::TxTooBigNoIcmp => "tx_too_big_no_icmp",
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
